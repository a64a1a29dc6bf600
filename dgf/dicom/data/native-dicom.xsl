<?xml version="1.0" encoding="UTF-8"?>
<!-- dgf XML header (DESIGN.md section 6) -> the Native DICOM Model of DICOM PS3.19 Annex A.1:
       xsltproc native-dicom.xsl header.xml > native.xml     (or: dgf_find ... then getfattr)
     The data set only, as dcmtk's dcm2xml -nat writes it (file meta is not part of the model).
     Each value of a multi-valued attribute (repeated siblings in dgf's model) becomes a numbered
     Value, person names are split into components, base64 values become InlineBinary, and bulk
     data left out of the header becomes a BulkData reference to the file it came from
     (uri="#tag", resolved against the instance by the reader). The tests compare the result with
     dcm2xml -nat on the same files. -->
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output method="xml" encoding="UTF-8" indent="yes"/>

  <xsl:template match="/DicomHeader">
    <NativeDicomModel xml:space="preserve"><xsl:apply-templates select="*[not(starts-with(@tag, '0002'))]"/></NativeDicomModel>
  </xsl:template>

  <!-- Group lengths are not part of the model; a private data element needs its creator (an
       original without one is invalid; dcmtk drops these too). -->
  <xsl:template match="*[substring(@tag, 5) = '0000']" priority="2"/>
  <xsl:template match="PrivateElement[not(@creator) and substring(@tag, 5, 2) != '00']" priority="2"/>

  <!-- Only the first of a run of siblings with one tag starts an attribute. -->
  <xsl:template match="*[@tag]">
    <xsl:variable name="tag" select="@tag"/>
    <xsl:if test="not(preceding-sibling::*[1][@tag = $tag])">
      <!-- A private data element is named by its creator and the low byte of its element
           number (PS3.19 A.1.1): the block it happened to be reserved in is not part of it. -->
      <xsl:variable name="name">
        <xsl:choose>
          <xsl:when test="@creator and substring(@tag, 5, 2) != '00'">
            <xsl:value-of select="concat(substring(@tag, 1, 4), '00', substring(@tag, 7, 2))"/>
          </xsl:when>
          <xsl:otherwise><xsl:value-of select="@tag"/></xsl:otherwise>
        </xsl:choose>
      </xsl:variable>
      <DicomAttribute tag="{$name}" vr="{@vr}">
        <xsl:if test="local-name() != 'PrivateElement' and local-name() != 'UnknownElement'">
          <xsl:attribute name="keyword"><xsl:value-of select="local-name()"/></xsl:attribute>
        </xsl:if>
        <xsl:if test="@creator">
          <xsl:attribute name="privateCreator"><xsl:value-of select="@creator"/></xsl:attribute>
        </xsl:if>
        <xsl:variable name="run" select=". | following-sibling::*[@tag = $tag]"/>
        <xsl:choose>
          <xsl:when test="@vr = 'SQ'">
            <xsl:for-each select="Item">
              <Item number="{position()}"><xsl:apply-templates select="*"/></Item>
            </xsl:for-each>
          </xsl:when>
          <xsl:when test="@bulk = 'true'">
            <BulkData uri="#{@tag}"/>
          </xsl:when>
          <!-- A single empty value is an attribute without value. -->
          <xsl:when test="count($run) = 1 and . = ''"/>
          <xsl:when test="@vr = 'PN' and count($run) = 1 and translate(., '^= ', '') = ''"/>
          <xsl:when test="@enc = 'base64' and not(contains('AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT', @vr))">
            <InlineBinary><xsl:value-of select="."/></InlineBinary>
          </xsl:when>
          <xsl:when test="@vr = 'PN'">
            <xsl:for-each select="$run">
              <PersonName number="{position()}">
                <xsl:call-template name="groups">
                  <xsl:with-param name="text" select="normalize-space(.)"/>
                  <xsl:with-param name="names" select="'Alphabetic Ideographic Phonetic '"/>
                </xsl:call-template>
              </PersonName>
            </xsl:for-each>
          </xsl:when>
          <xsl:otherwise>
            <xsl:for-each select="$run">
              <Value number="{position()}">
                <xsl:call-template name="rtrim"><xsl:with-param name="text" select="string(.)"/></xsl:call-template>
              </Value>
            </xsl:for-each>
          </xsl:otherwise>
        </xsl:choose>
      </DicomAttribute>
    </xsl:if>
  </xsl:template>

  <!-- Trailing spaces are padding, never part of a value (PS3.5 6.2). -->
  <xsl:template name="rtrim">
    <xsl:param name="text"/>
    <xsl:choose>
      <xsl:when test="substring($text, string-length($text)) = ' '">
        <xsl:call-template name="rtrim">
          <xsl:with-param name="text" select="substring($text, 1, string-length($text) - 1)"/>
        </xsl:call-template>
      </xsl:when>
      <xsl:otherwise><xsl:value-of select="$text"/></xsl:otherwise>
    </xsl:choose>
  </xsl:template>

  <!-- Person name component groups (separated by '='), each split into its five components. -->
  <xsl:template name="groups">
    <xsl:param name="text"/>
    <xsl:param name="names"/>
    <xsl:variable name="group" select="substring-before(concat($text, '='), '=')"/>
    <xsl:if test="translate($group, '^ ', '') != ''">
      <xsl:element name="{substring-before($names, ' ')}">
        <xsl:call-template name="components">
          <xsl:with-param name="text" select="$group"/>
          <xsl:with-param name="names" select="'FamilyName GivenName MiddleName NamePrefix NameSuffix '"/>
        </xsl:call-template>
      </xsl:element>
    </xsl:if>
    <xsl:if test="contains($text, '=') and substring-after($names, ' ') != ''">
      <xsl:call-template name="groups">
        <xsl:with-param name="text" select="substring-after($text, '=')"/>
        <xsl:with-param name="names" select="substring-after($names, ' ')"/>
      </xsl:call-template>
    </xsl:if>
  </xsl:template>

  <xsl:template name="components">
    <xsl:param name="text"/>
    <xsl:param name="names"/>
    <xsl:variable name="part" select="substring-before(concat($text, '^'), '^')"/>
    <xsl:if test="$part != ''">
      <xsl:element name="{substring-before($names, ' ')}"><xsl:value-of select="$part"/></xsl:element>
    </xsl:if>
    <xsl:if test="contains($text, '^') and substring-after($names, ' ') != ''">
      <xsl:call-template name="components">
        <xsl:with-param name="text" select="substring-after($text, '^')"/>
        <xsl:with-param name="names" select="substring-after($names, ' ')"/>
      </xsl:call-template>
    </xsl:if>
  </xsl:template>
</xsl:stylesheet>
