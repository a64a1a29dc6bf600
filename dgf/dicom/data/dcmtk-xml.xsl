<?xml version="1.0" encoding="UTF-8"?>
<!-- dgf XML header (DESIGN.md section 6) -> dcmtk's XML format (dcm2xml.dtd), which dcmtk's
     xml2dcm turns back into a DICOM file: xsltproc dcmtk-xml.xsl header.xml > h.xml; xml2dcm h.xml out.dcm
     Multi-valued attributes (repeated siblings in dgf's model) are joined with backslashes, AT
     values written (gggg,eeee), base64 values marked binary="base64".  Left out: bulk data, and
     OW/OF/OD/OL/OV values (palette tables and the like), which xml2dcm (dcmtk 3.6.7) does not read
     as base64. -->
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="xml" encoding="UTF-8" indent="no"/>

  <xsl:template match="/DicomHeader">
    <file-format>
      <meta-header xfer="1.2.840.10008.1.2.1">
        <xsl:apply-templates select="*[starts-with(@tag, '0002')]"/>
      </meta-header>
      <data-set xfer="{TransferSyntaxUID}">
        <xsl:apply-templates select="*[not(starts-with(@tag, '0002'))]"/>
      </data-set>
    </file-format>
  </xsl:template>

  <!-- Only the first of a run of siblings with one tag starts an element. -->
  <xsl:template match="*[@tag]">
    <xsl:variable name="tag" select="@tag"/>
    <xsl:if test="not(preceding-sibling::*[1][@tag = $tag]) and not(@bulk = 'true')
                  and not(@enc = 'base64' and contains('OW OF OD OL OV', @vr))">
      <xsl:variable name="dcmtag" select="concat(substring(@tag, 1, 4), ',', substring(@tag, 5, 4))"/>
      <xsl:choose>
        <xsl:when test="@vr = 'SQ'">
          <sequence tag="{$dcmtag}" vr="SQ" card="{count(Item)}" name="{local-name()}">
            <xsl:for-each select="Item">
              <item card="{count(*[@tag])}">
                <xsl:apply-templates select="*"/>
              </item>
            </xsl:for-each>
          </sequence>
        </xsl:when>
        <xsl:otherwise>
          <xsl:variable name="run" select=". | following-sibling::*[@tag = $tag]"/>
          <element tag="{$dcmtag}" vr="{@vr}" vm="{count($run[normalize-space(.) != '' or @enc])}" name="{local-name()}">
            <xsl:if test="@enc = 'base64'">
              <xsl:attribute name="binary">base64</xsl:attribute>
            </xsl:if>
            <xsl:for-each select="$run">
              <xsl:if test="position() &gt; 1">\</xsl:if>
              <xsl:choose>
                <xsl:when test="../*[@tag = $tag][1]/@vr = 'AT' and string-length(.) = 8">
                  <xsl:value-of select="concat('(', substring(., 1, 4), ',', substring(., 5, 4), ')')"/>
                </xsl:when>
                <xsl:otherwise><xsl:value-of select="."/></xsl:otherwise>
              </xsl:choose>
            </xsl:for-each>
          </element>
        </xsl:otherwise>
      </xsl:choose>
    </xsl:if>
  </xsl:template>
</xsl:stylesheet>
